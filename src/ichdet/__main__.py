"""``python -m ichdet`` (what ``torchrun -m ichdet train ...`` runs on every process)."""

from ichdet.cli import main

main()
