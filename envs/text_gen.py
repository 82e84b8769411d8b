"""TextGen-v0: continue a movie-review opening, one token per step, rewarded by a learned reward model.

The single env; ``envs.vector.TextGenVectorEnv`` runs the same episode logic (``envs.batch``) for N
episodes at once. The class docstring below is the env's documentation, in Gymnasium's sections.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from envs.batch import TextGenBatch
from envs.inputs import as_action, check_prompt, check_seed, reset_options
from envs.spaces import action_space, observation_space
from envs.task import TextGenTask, build_lm_task


class TextGenEnv(gym.Env):
    """A pretrained causal LM's text generation as a Gymnasium env.

    ## Description
    A pretrained causal LM's text generation as an MDP. The state is a prompt plus the tokens
    generated so far; an action is the next token. The default task is the IMDb controlled-sentiment
    experiment (Ziegler et al. 2019) at small scale: continue a review opening so that the review
    turns positive, scored by the shipped reward model, without drifting far from the pretrained LM.

    ## Action Space
    ``Discrete(V)``, V = the model's logit width (``config.vocab_size``). Pad and special tokens
    other than EOS are never valid (``action_masks()``, ``info["action_mask"]``, the sb3-contrib
    MaskablePPO convention); with ``top_k``/``top_p`` the valid set is further restricted to the
    reference LM's top-k / nucleus tokens (as RL4LMs' NLPO does). An invalid action raises
    ``ValueError``; nothing is clipped. The space is an ``envs.spaces.TokenActions``, a ``Discrete`` whose
    ``sample()`` draws only valid tokens, so random exploration (SB3's epsilon-greedy and warm-up,
    the env checkers) never produces an action the env must reject.

    ## Observation Space
    ``Dict(input_ids=Box(0, V-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))`` with
    L = longest prompt context + ``max_new_tokens``, **left-padded**: the newest token is always at
    index -1 and ``input_ids[attention_mask == 1]`` is the current context. An agent that keeps its own
    KV cache only needs ``input_ids[-1]`` per step (the token it just chose) after the first step.

    ## Rewards
    With beta = ``ref_logprob_coef``, each step pays ``beta * log pi_ref(a_t | s_t)`` (the frozen reference =
    the pretrained LM, KV-cached), and the last step adds the reward model's score of (prompt,
    completion) (normalised: 0 = an average pretrained-LM completion, 1 = one std better). The
    completion is the decoded *text* of the generated tokens (EOS excluded), re-tokenised canonically
    for the reward model, so the reward is a function of the text: exactly ``rm.score([prompt],
    [completion])``, whatever segmentation the policy sampled; an immediate EOS is the empty
    completion. In every variant the judged text is the review, prompt + completion: few-shot
    demonstrations and instructions are context for the LM only. Because

        E_pi[ R - beta log(pi / pi_ref) ] = E_pi[ R + beta log pi_ref ] + beta * H(pi),

    an agent that adds an entropy bonus with coefficient beta optimises the KL-regularised RLHF
    objective without ever evaluating the reference itself, provided the entropy is part of its
    *return* (soft RL: entropy-regularised returns, a soft-Q backup, or charging -beta log pi(a_t|s_t)
    per token as ``agents.sb3.TextGenCallback(kl_coef=beta)`` does). A per-state entropy bonus in the
    loss (SB3's ``ent_coef``) is exact for one token only: it never credits an action with the
    entropy it removes from later states, and on TextGen-v0 it let the policy drift to low-entropy
    text (measured in ``agents/sb3.py``).

    ## Episode End
    Terminated when the action is EOS or ``max_new_tokens`` tokens have been generated (the reward is
    final then, so this is termination, not truncation). ``step`` after the end raises ``RuntimeError``.

    ## Info
    Every step: ``action_mask`` and, when a reference is loaded (``ref_logprob_coef > 0`` or top-k/top-p),
    ``ref_logprob``. At the end: ``rm_score`` (the reward's score of the finished episode: the reward
    model's, the classifier's, the function's or their weighted sum), ``gold_score`` (by default VADER
    compound of prompt + completion; monitoring only, never in the reward; NaN with ``gold=False``),
    ``text`` (the completion), ``prompt``, and for a weighted reward ``reward_terms`` (each term's
    unweighted value, by name).
    Invalid arguments, seeds, options and actions raise ``ValueError`` (``TypeError`` for a wrong
    type) naming the value (``envs.inputs``); the env stays usable after any of them.

    ## Arguments
    ``model`` ("default" or an HF causal-LM dir: tokenizer, actions and reference).
    ``reward`` (``reward_model`` is its older name): "default" (the shipped reward model),
    "default-classifier" (the shipped classifier of the human review labels), a reward-model or any
    ``*ForSequenceClassification`` dir, a ``RewardModel``, a callable ``(prompts, completions) ->
    floats`` or "module:function"; or a list of these with ``reward_weights`` (their weighted sum);
    ``reward_label`` / ``reward_output`` pick a multi-label classifier's score (default: the
    ``positive`` label's logit) (``envs.rewards``). ``gold``: True/"vader", False/"none", a callable
    ``texts -> floats``, "module:function", "default-classifier" or a classifier dir (``rlhf.gold``).
    ``prompts`` (None = the shipped prompts of ``prompt_split``; a list, a text/JSONL/CSV file, a
    ``datasets`` dataset or ``save_to_disk`` dir, with ``prompt_field`` the JSONL field / column;
    ``envs.prompts``), ``max_new_tokens``, ``ref_logprob_coef`` (beta of the shaping above;
    ``kl_coef`` is its deprecated name), ``device``, ``render_mode`` ("ansi" returns the text,
    "human" prints it), ``top_k``, ``top_p``, ``variant``/``shots``/``cot`` (the FewShot and
    Instruct versions). Every model is loaded and probed here, so an unusable one fails at
    construction, naming the dir. ``reset(options={"prompt": s})`` forces a prompt.

    ## Version History
    * v0: initial version. The env's ``kl_coef`` was renamed ``ref_logprob_coef`` (the old name still
      works, with a ``DeprecationWarning``).
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
        model: str = "default",
        reward_model=None,
        prompts=None,
        prompt_split: str = "train",
        max_new_tokens: int = 24,
        ref_logprob_coef: float = 0.0,
        device: str = "cpu",
        render_mode: str | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        gold=True,
        variant: str = "plain",
        shots: int = 2,
        cot: bool = False,
        task: TextGenTask | None = None,
        kl_coef: float | None = None,
        reward=None,
        reward_weights=None,
        reward_label=None,
        reward_output: str = "logit",
        prompt_field: str = "prompt",
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; expected one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.task = task or build_lm_task(
            model=model, reward_model=reward_model, prompts=prompts, prompt_split=prompt_split,
            max_new_tokens=max_new_tokens, ref_logprob_coef=ref_logprob_coef, device=device, variant=variant, shots=shots,
            cot=cot, top_k=top_k, top_p=top_p, gold=gold, kl_coef=kl_coef, reward=reward,
            reward_weights=reward_weights, reward_label=reward_label, reward_output=reward_output, prompt_field=prompt_field,
        )
        self.batch = TextGenBatch(self.task, 1)
        self._action = torch.zeros(1, dtype=torch.long, device=self.task.device)
        self.observation_space = observation_space(self.task.n_actions, self.task.max_len)
        self.action_space = action_space(self.task.valid_actions)
        self._started = False

    @property
    def tokenizer(self):
        return self.task.tokenizer

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        seed, options = check_seed(seed), reset_options(options)  # before anything changes: a rejected reset changes nothing
        if "prompt" in options:
            check_prompt(self.tokenizer, options["prompt"], "options['prompt']")
        super().reset(seed=seed)
        if "prompt" in options:
            self.batch.reset_rows([0], [0], [options["prompt"]])
        else:
            self.batch.reset_rows([0], [int(self.np_random.integers(len(self.task.prompts)))])
        self._started = True
        info = {"prompt": self.batch.episodes[0].prompt, "action_mask": self.action_masks()}
        return self._observation(), info

    def step(self, action):
        if not self._started:
            raise RuntimeError("step() called before reset()")
        if self.batch.done_rows:  # the host-side copy of done: no device read
            raise RuntimeError("step() called after the episode ended; call reset() first")
        action = as_action(action)
        self.batch.validate_one(action)
        result = self.batch.step(self._action.fill_(action))  # a reused (1,) tensor: the batch keeps no reference
        info = {}
        if result.ref_logprobs is not None:
            info["ref_logprob"] = result.ref_logprobs.item()
        terminated = bool(result.terminated.item())
        if terminated:
            info.update(result.finished[0])
        info["action_mask"] = self.action_masks()
        if self.render_mode == "human":
            self.render()
        return self._observation(), result.rewards.item(), terminated, False, info

    def action_masks(self) -> np.ndarray:
        """(V,) bool: the tokens that are valid actions now (a new array on every call)."""
        if not self.batch.restricts_per_state:  # the vocabulary's mask, without a device round trip
            return self.task.valid_actions_host.copy()
        return self.batch.action_masks()[0].cpu().numpy()

    def render(self):
        text = self.text()
        if self.render_mode == "ansi":
            return text
        if self.render_mode == "human":
            print(text)
        return None

    def text(self) -> str:
        """The prompt followed by the completion so far."""
        if not self._started:
            return ""
        ids, mask = self.batch.generated_ids(torch.tensor([0], device=self.task.device))
        ids = ids[0][mask[0]].tolist()
        return self.batch.episodes[0].prompt + self.tokenizer.decode(ids, skip_special_tokens=True)

    def _observation(self) -> dict[str, np.ndarray]:
        # New arrays each call: the caller owns them, later steps must not change them.
        return {"input_ids": self.batch.input_ids[0].cpu().numpy().copy(),
                "attention_mask": self.batch.attention_mask[0].cpu().numpy().copy()}
