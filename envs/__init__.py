"""envs: the TextGen Gymnasium environment suite, its batched (KV-cached) vector version, registration.

``import envs`` registers the suite with Gymnasium (or use ``gym.make("envs:TextGen-v0")``):

* ``TextGen-v0``          continue a review opening positively; shipped LM + reward model
* ``TextGenFewShot-v0``   the same with k positive demonstration reviews in context (``shots``)
* ``TextGenInstruct-v0``  an instruction template ("Write a glowing review of a film about ...")
* ``TextGenClassifier-v0`` TextGen-v0 rewarded by the shipped sentiment classifier trained on the
                          *human* review labels (its POSITIVE logit), the reference experiment's reward
* ``TextGenToy-v0``       8-word vocabulary, horizon 4, known optimal policy (tests, smoke runs)

Each has a native vector version: ``gym.make_vec(id, num_envs=64, vectorization_mode="vector_entry_point")``.
Sits on ``rlhf`` and ``pretrain`` and never imports ``agents``.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = ("TextGen-v0", "TextGenFewShot-v0", "TextGenInstruct-v0", "TextGenClassifier-v0", "TextGenToy-v0")

_SPECS = {
    "TextGen-v0": ("envs.text_gen:TextGenEnv", "envs.vector:TextGenVectorEnv", {}),
    "TextGenFewShot-v0": ("envs.text_gen:TextGenEnv", "envs.vector:TextGenVectorEnv", {"variant": "few_shot", "shots": 2}),
    "TextGenInstruct-v0": ("envs.text_gen:TextGenEnv", "envs.vector:TextGenVectorEnv", {"variant": "instruct"}),
    "TextGenClassifier-v0": ("envs.text_gen:TextGenEnv", "envs.vector:TextGenVectorEnv", {"reward": "default-classifier"}),
    "TextGenToy-v0": ("envs.toy:TextGenToyEnv", "envs.toy:TextGenToyVectorEnv", {}),
}

for _id, (_entry, _vector_entry, _kwargs) in _SPECS.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry, vector_entry_point=_vector_entry, kwargs=_kwargs)
