"""``python -m ilmconvert ...`` (and ``torchrun --nproc_per_node N -m ilmconvert finetune ...``)."""

from ilmconvert.cli import main

main()
