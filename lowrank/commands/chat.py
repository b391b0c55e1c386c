"""lowrank chat MODEL [--adapter DIR]: terminal chat with streamed answers."""

from __future__ import annotations


def add_generation_options(p) -> None:
    p.add_argument("model", help="base model directory (transformers format)")
    p.add_argument("--adapter", help="adapter directory, e.g. OUTPUT_DIR/epoch_3 from lowrank train")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="'auto' (the GPU when there is one), 'cpu', 'cuda', ...")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load the adapter although it names another base model (load_adapter's allow_other_base)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read an adapter saved only as a pickled adapter_model.bin (older PEFT; load_adapter's "
                        "allow_pickle): only from a source you trust, a pickle can run code")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model directory's own Python code (transformers' trust_remote_code; "
                        "InternLM needs it)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (and adapter) in the terminal")
    add_generation_options(p)
    from ..workflow.template import TEMPLATES  # a name checked before the model loads (minutes for a 7B)

    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="named template (default: the adapter's training template, else the tokenizer's)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from ..workflow.chat import loop
    from ..workflow.generate import Settings
    from ..workflow.model import load_with_adapter
    from ..workflow.template import check_template
    from .adapter_checks import refuse_before_loading

    if args.temperature == 0 and (args.top_p != 1 or args.top_k != 0):  # greedy: they would change nothing
        given = " and ".join(f for f, on in (("--top-p", args.top_p != 1), ("--top-k", args.top_k != 0)) if on)
        raise ValueError(f"{given}: options of sampling, and --temperature is 0, which answers greedily (always the "
                         "likeliest token), so they would change nothing; give a --temperature above 0 too (e.g. 0.7)")
    settings = Settings(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    refuse_before_loading(args.adapter, args.model, allow_pickle=args.allow_pickle,
                          allow_other_base=args.allow_other_base)
    model, tokenizer, template = load_with_adapter(args.model, args.adapter, args.dtype, args.device,
                                                   allow_other_base=args.allow_other_base, allow_pickle=args.allow_pickle,
                                                   trust_remote_code=args.trust_remote_code)
    template = args.template or template
    check_template(template, tokenizer)
    loop(model, tokenizer, template, settings, args.system)
    return 0
