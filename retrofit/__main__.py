"""``python -m retrofit ...``: the same command line as ``retrofit ...``, for launchers that start a module
(``accelerate launch -m retrofit finetune recipe.yaml``, ``torchrun -m retrofit ...``)."""

from retrofit_command import main

if __name__ == "__main__":
    main()
