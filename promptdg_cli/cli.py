"""``promptdg``: subcommand dispatch.

``train``, ``eval`` and ``generate`` each hand the rest of the command line to their own
``@hydra.main`` app (config ``conf/<command>.yaml``), so overrides, ``-m`` multirun, ``--cfg job``,
``--help``, ``--info`` and launchers all keep working. ``collect`` is a plain argparse command.

Shell completion: Hydra's completion script (``promptdg -sc install=bash``, or after any command)
completes a line by calling ``promptdg -sc query=<shell>`` with the line in ``$COMP_LINE``. The
query is answered here: the command names while the first word is typed, then the named command's
Hydra app with the command word taken out of the line (config groups, keys and values), and for
``collect`` its options and filter keys (nothing for a folder: the shell completes file names).
"""
from __future__ import annotations

import difflib
import os
import re
import sys

HELP = """\
usage: promptdg <command> [overrides ...]

A command-line experiment runner for CLIP-based domain generalization and adaptation.
Every command defaults to the offline demo world (dataset=demo_digits, backbone=demo_clip),
which is generated and pretrained on first use.

commands:
  train     train a method and test it (Hydra app: key=value overrides, -m sweeps, --help)
              promptdg train method=coop dataset=demo_digits target=sketch
              promptdg train -m method=zeroshot,linear_probe,coop seed=1,2,3
  eval      evaluate without training (zero-shot), or re-evaluate a finished run's models
              promptdg eval method=zeroshot dataset=pacs backbone=vit_b16
              promptdg eval run_dir=outputs/demo_digits/coop/demo_clip/seed1_sketch_<hash>
  generate  write a generated image set to disk (for methods that synthesise data)
              promptdg generate method=<generating method> dataset=pacs target=sketch
  collect   gather every results.json below a folder into paper-style tables
              promptdg collect outputs/ method=coop,zeroshot

`promptdg <command> --help` lists the config groups (method, dataset, backbone) and their choices;
`promptdg train --cfg job` prints the composed config without running it.

sweeps (-m) run one job after another here, or in parallel through submitit:
  promptdg train -m hydra/launcher=local method=zeroshot,linear_probe           (local processes)
  promptdg train -m hydra/launcher=slurm resources=gpu1 hydra.launcher.partition=<p> seed=1,2,3
A rerun of the same sweep skips finished runs and retries failed ones; a sweep with a failed run
exits 1 and lists the failed run directories (each holds results.json with the error).
"""

COMMANDS = ("train", "eval", "generate", "collect")
HYDRA_COMMANDS = ("train", "eval", "generate")
COMPLETION_FLAGS = ("-sc", "--shell-completion")  # Hydra's flag
SHELLS = ("bash", "zsh", "fish")  # Hydra's completion plugins


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"promptdg {__version__}")
        return 0
    if argv[0] in COMPLETION_FLAGS:  # `promptdg -sc query=bash`: what the installed completion calls
        return _completion(argv[1:])
    cmd, rest = argv[0], argv[1:]
    if cmd == "collect":
        from .collect import main as collect_main

        return collect_main(rest)
    if cmd not in COMMANDS:
        near = difflib.get_close_matches(cmd, COMMANDS, n=1)
        print(
            f"promptdg: unknown command {cmd!r}. Valid: {', '.join(COMMANDS)}."
            + (f" Did you mean {near[0]!r}?" if near else ""),
            file=sys.stderr,
        )
        return 2
    return _hydra_command(cmd, rest)


def _hydra_command(cmd: str, rest: list[str]) -> int:
    import hydra

    from .config import conf_dir, register_configs, register_resolvers

    register_resolvers()
    register_configs()
    from . import commands

    task = getattr(commands, cmd)
    app = hydra.main(config_path=str(conf_dir()), config_name=cmd, version_base="1.3")(task)
    saved = sys.argv
    # Hydra's completion script registers the program named by argv[0]: `promptdg`, never `promptdg train`
    sys.argv = ["promptdg" if any(a in COMPLETION_FLAGS for a in rest) else f"promptdg {cmd}"] + rest
    previous = commands.start_sweep_report()
    code = 0
    try:
        app()
    except SystemExit as e:  # Hydra's own errors (composition, a launcher that failed), and _guard's
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if code == 0 or commands._SWEEP["report"] is None:
            raise
    finally:
        sys.argv = saved
        report = commands.finish_sweep_report(previous)
    # a sweep (-m): one summary line; "N of M runs failed: <dirs>" and exit 1 when a job failed
    if report is not None:
        code = max(code, commands.print_sweep_summary(report, stopped=code))
    return code


def _completion(args: list[str]) -> int:
    """``promptdg -sc install=SHELL | uninstall=SHELL | query=SHELL``."""
    action, _, shell = args[0].partition("=") if len(args) == 1 else ("", "", "")
    if action not in ("install", "uninstall", "query") or shell not in SHELLS:
        print(f"promptdg: -sc {' '.join(args)!r} is not valid. Valid: -sc install=SHELL, -sc uninstall=SHELL "
              f"(SHELL: {', '.join(SHELLS)}); e.g. eval \"$(promptdg -sc install=bash)\"", file=sys.stderr)
        return 2
    if action != "query":  # the script is the same for every command: it asks `promptdg -sc query=...`
        return _hydra_command("train", ["-sc", args[0]])
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    typing_first = len(words) < 2 or (len(words) == 2 and not line.endswith(" "))
    sep = "\n" if shell == "fish" else " "
    if typing_first:  # the command word itself
        prefix = words[1] if len(words) == 2 else ""
        print(sep.join(c for c in COMMANDS if c.startswith(prefix)))
        return 0
    cmd = words[1]
    if cmd in HYDRA_COMMANDS:
        # the command's Hydra app completes the line without the command word ("promptdg method=co")
        os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+\s+)" + re.escape(cmd) + r"(\s+|$)", r"\1", line, count=1)
        return _hydra_command(cmd, ["-sc", args[0]])
    if cmd == "collect":
        word = "" if line.endswith(" ") else words[-1]
        from .collect import FILTER_KEYS, build_parser

        options = [o for a in build_parser()._actions for o in a.option_strings] if word.startswith("-") else []
        keys = (
            [f"{k}=" for k in FILTER_KEYS]
            if word and not word.startswith(("-", ".", "/", "~")) and "=" not in word
            else []
        )
        print(sep.join(c for c in options + keys if c.startswith(word)))  # nothing: the shell completes a folder
    return 0


if __name__ == "__main__":  # python -m promptdg_cli.cli
    sys.exit(main())
