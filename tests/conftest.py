"""Put the repository root first on sys.path: the venv's editable install resolves
`ntk_tracking` as an empty namespace package unless the working tree is importable."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
