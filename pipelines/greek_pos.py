"""Part-of-speech tagging of Ancient Greek with a transformer (paper §4).

    git clone https://github.com/UniversalDependencies/UD_Ancient_Greek-Perseus
    mlflow run . -e greek_pos --env-manager local -P dataset=UD_Ancient_Greek-Perseus
    python -m pipelines.greek_pos --help
"""

from ntk_tracking.cli import train_main

if __name__ == "__main__":
    train_main("greek_pos", prog="python -m pipelines.greek_pos")
