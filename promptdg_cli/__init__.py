"""promptdg: a command-line experiment runner for CLIP-based domain generalization and adaptation."""
from pathlib import Path

__version__ = "0.1.0"


def conf_dir() -> Path:
    """conf/ inside an installed wheel (promptdg_cli/conf), else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"promptdg's conf/ directory was not found next to {here}")
