"""`python -m lowrank.demo [--model DIR] [--data FILE] ...`: see lowrank/demo/qlora_minilm.py."""

from .qlora_minilm import main

if __name__ == "__main__":
    main()
