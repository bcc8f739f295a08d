"""``python -m rl_plasticity`` is the same as ``rlp``."""

from rl_plasticity.cli import main

main()
