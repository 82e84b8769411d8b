"""The ``textgym`` console script: one subcommand per config dataclass.

    textgym pretrain --help
    textgym sample --prompt "This movie was"

Flags and their help are generated from the config dataclasses (``transformers.HfArgumentParser``
reads ``field(metadata={"help": ...})``), so each option is documented exactly once, next to its
default.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from agents import dqn, grpo, ppo, reinforce, sb3, trpo
from agents.evaluate import EvalConfig, evaluate
from agents.frontier import FrontierConfig, frontier
from pretrain.corpus import PromptsConfig, make_prompts
from pretrain.sample import SampleConfig, sample
from pretrain.train import PretrainConfig
from pretrain.train import train as pretrain
from rlhf.dpo import DPOConfig, train_dpo
from rlhf.preferences import PreferenceConfig, make_preferences
from rlhf.reward_training import RewardConfig, train_reward_model
from rlhf.sentiment_classifier import ClassifierConfig, train_classifier
from rlhf.sft import SFTConfig, train_sft


@dataclass(frozen=True)
class Command:
    config: type
    run: Callable
    summary: str


COMMANDS: dict[str, Command] = {
    "pretrain": Command(PretrainConfig, pretrain, "pretrain a GPT-2-architecture LM on the review corpus"),
    "prompts": Command(PromptsConfig, make_prompts, "regenerate the shipped prompt file from the corpus"),
    "sample": Command(SampleConfig, sample, "sample continuations of a prompt from a model"),
    "preferences": Command(PreferenceConfig, make_preferences, "sample completions, label preference pairs with the gold scorer"),
    "reward": Command(RewardConfig, train_reward_model, "train a Bradley-Terry reward model on preference pairs"),
    "classifier": Command(ClassifierConfig, train_classifier, "train the sentiment classifier on human review labels (the second shipped reward)"),
    "sft": Command(SFTConfig, train_sft, "supervised fine-tuning on (prompt, completion) demonstrations"),
    "dpo": Command(DPOConfig, train_dpo, "Direct Preference Optimization against a frozen reference"),
    "eval": Command(EvalConfig, evaluate, "compare trained policies on held-out prompts (gold, RM, KL); JSON + plot"),
    "frontier": Command(FrontierConfig, frontier, "sweep every method's strength, evaluate all checkpoints, draw the gold-vs-KL "
                                                  "frontier with best-of-n and the Gao fits"),
}

TRAIN: dict[str, Command] = {
    "ppo": Command(ppo.PPOConfig, ppo.train, "PPO-clip (or PPO-penalty) with GAE, value head and KL to the reference"),
    "reinforce": Command(reinforce.ReinforceConfig, reinforce.train, "REINFORCE with a baseline (none, moving average, RLOO)"),
    "grpo": Command(grpo.GRPOConfig, grpo.train, "GRPO: group-relative advantages, clipped ratio, no value head (Dr. GRPO, DAPO variants)"),
    "trpo": Command(trpo.TRPOConfig, trpo.train, "TRPO: natural gradient by conjugate gradient, KL trust region, line search"),
    "dqn": Command(dqn.DQNConfig, dqn.train, "soft Q-learning with Q = V + beta log pi from the LM: path consistency over fresh + replayed episodes (default), or TD over transitions"),
    "sb3-ppo": Command(sb3.SB3PPOConfig, partial(sb3.train, algorithm="ppo"), "Stable-Baselines3 PPO with the LM as its actor-critic policy"),
    "sb3-a2c": Command(sb3.SB3A2CConfig, partial(sb3.train, algorithm="a2c"), "Stable-Baselines3 A2C with the LM as its actor-critic policy"),
    "sb3-dqn": Command(sb3.SB3DQNConfig, partial(sb3.train, algorithm="dqn"), "Stable-Baselines3 DQN with Q = V + T log pi from the LM"),
}


def version() -> str:
    try:
        return importlib.metadata.version("textgym")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def all_command_names() -> list[str]:
    return [*COMMANDS, *(f"train {name}" for name in TRAIN)]


def make_parser(command: Command, prog: str) -> HfArgumentParser:
    """The command's flags from its config dataclass; a ``--no-x`` flag says what it turns off."""
    parser = HfArgumentParser(command.config, prog=prog, description=command.config.__doc__)
    positive = {a.dest: a for a in parser._actions if a.option_strings and not a.option_strings[0].startswith("--no_")}
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            original = positive.get(action.dest)
            what = f" ({original.help})" if original is not None and original.help else ""
            action.help = f"turn --{action.dest.replace('_', '-')} off{what}; it is on by default"
            action.default = argparse.SUPPRESS  # the positive flag's default stands; no "(default: False)"
    return parser


def unknown_flags_message(parser: HfArgumentParser, unknown: list[str], prog: str) -> str:
    """``prog: unknown flag --lr-rate; did you mean --lr?`` for each unknown flag, with close matches."""
    options = sorted({opt.replace("_", "-") for action in parser._actions for opt in action.option_strings if opt.startswith("--")})
    lines, after_flag = [], False
    for arg in unknown:
        if not arg.startswith("-"):
            if not after_flag:  # a value right after an unknown flag is that flag's value
                lines.append(f"{prog}: unexpected argument {arg!r} (flags take the form --name value)")
            after_flag = False
            continue
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("_", "-"), options, n=3, cutoff=0.6)
        owners = commands_with_field(flag.lstrip("-").replace("-", "_"))
        if owners:  # a flag of another command: say whose, rather than guess a near spelling here
            hint = f"; it is a flag of {' and '.join(owners)}" if len(owners) <= 3 else \
                f"; it is a flag of {', '.join(owners[:3])} and {len(owners) - 3} more commands"
        elif close:
            hint = f"; did you mean {' or '.join(close)}?"
        else:
            hint = f"; see {prog} --help for the flags"
        lines.append(f"{prog}: unknown flag {flag}{hint}")
        after_flag = "=" not in arg
    return "\n".join(lines)


def commands_with_field(name: str) -> list[str]:
    """The commands whose config has the field ``name`` (``--group-size``: ``textgym train grpo``)."""
    from dataclasses import fields

    tables = ((COMMANDS, "textgym "), (TRAIN, "textgym train "))
    return [prefix + command for table, prefix in tables for command, entry in table.items()
            if name in {f.name for f in fields(entry.config)}]


def usage() -> str:
    lines = ["usage: textgym COMMAND [--flag value ...]   (textgym COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<16} {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += [f"  {'train ' + name:<16} {cmd.summary}" for name, cmd in TRAIN.items()]
    return "\n".join(lines)


def train_usage() -> str:
    lines = ["usage: textgym train ALGORITHM [--flag value ...]   (textgym train ALGORITHM --help for its flags)", "", "algorithms:"]
    lines += [f"  {name:<10} {cmd.summary}" for name, cmd in TRAIN.items()]
    return "\n".join(lines)


def merge_repeated_flags(parser: HfArgumentParser, args: list[str]) -> list[str]:
    """``--reward a --reward b`` as ``--reward a b``: a list flag may be repeated (argparse keeps only
    the last occurrence of an ``nargs="+"`` flag)."""
    list_flags = {opt: action for action in parser._actions if action.nargs == "+" for opt in action.option_strings}
    out: list[str] = []
    first: dict[str, int] = {}  # list flag -> index in out just after its values
    i = 0
    while i < len(args):
        arg = args[i]
        action = list_flags.get(arg)
        if action is None:
            out.append(arg)
            i += 1
            continue
        j = i + 1
        while j < len(args) and not (args[j].startswith("--") or (args[j].startswith("-") and not _is_number(args[j]))):
            j += 1
        values = args[i + 1 : j]
        if action.dest in first:
            at = first[action.dest]
            out[at:at] = values
            first = {k: v + len(values) if v >= at and k != action.dest else v for k, v in first.items()}
            first[action.dest] = at + len(values)
        else:
            out += [arg, *values]
            first[action.dest] = len(out)
        i = j
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def given_fields(parser: HfArgumentParser, args: list[str]) -> set[str]:
    """The config fields whose flags appear in ``args`` (``--num-envs 8``, ``--num_envs=8``, ``--no-x``)."""
    given = set()
    for action in parser._actions:
        if any(a == opt or a.startswith(opt + "=") for a in args for opt in action.option_strings if opt.startswith("--")):
            given.add(action.dest)
    return given


def resumed_config(config_cls: type, cfg, given: set[str], prog: str):
    """``--resume DIR``: the run's own settings (from its newest checkpoint), with the flags given
    again on top; the run then checks that none of them changes what the run is."""
    from dataclasses import fields

    from pretrain.run_dir import RunDir

    run = RunDir(cfg.resume, prog.removeprefix("textgym "), resume=True)
    names = {f.name for f in fields(config_cls)}
    saved = {**getattr(config_cls, "OLDER_RUNS", {}), **run.saved_config()}  # a field newer than the run: its value then
    saved = {k: v for k, v in saved.items() if k in names and k not in ("out", "overwrite", "resume")}
    return config_cls(**{**saved, **{k: getattr(cfg, k) for k in given if k in names}, "resume": cfg.resume})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"textgym {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    table = COMMANDS
    if name == "train":
        if not rest or rest[0] in ("-h", "--help"):
            print(train_usage())
            return 0
        if rest[0] not in TRAIN:
            print(f"textgym train: unknown algorithm {rest[0]!r}; valid algorithms: {', '.join(TRAIN)}\n\n{train_usage()}", file=sys.stderr)
            return 2
        table, name, rest = TRAIN, rest[0], rest[1:]
    if name not in table:
        close = difflib.get_close_matches(name, ["train", *all_command_names()], n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        print(f"textgym: unknown command {name!r}{hint}; valid commands: {', '.join(all_command_names())}\n\n{usage()}",
              file=sys.stderr)
        return 2
    hf_logging.disable_progress_bar()  # our own rich bars are the progress display
    command = table[name]
    prog = f"textgym train {name}" if table is TRAIN else f"textgym {name}"
    parser = make_parser(command, prog)
    rest = merge_repeated_flags(parser, rest)
    try:
        cfg, unknown = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
        if unknown:
            print(unknown_flags_message(parser, unknown, prog), file=sys.stderr)
            return 2
        if isinstance(getattr(cfg, "resume", None), str) and cfg.resume:
            cfg = resumed_config(command.config, cfg, given_fields(parser, rest), prog)
    except ValueError as err:  # raised by a config's __post_init__
        parser.error(str(err))
    except (FileNotFoundError, FileExistsError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    try:
        command.run(cfg)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError, FloatingPointError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
