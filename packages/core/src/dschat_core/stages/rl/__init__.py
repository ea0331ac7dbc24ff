"""Stage 3: PPO, GRPO, RLOO and REINFORCE++ (docs/training.md), one stage whose settings choose the algorithm.

- :mod:`.stage`: the stage on the run chassis (the loop, updates, PTX, EMA, evaluation, saving)
- :mod:`.roles`: the engines the settings need (actor, reference, EMA, critic, reward model) as specs
- :mod:`.engines`: the rollout-engine seam (``ppo.rollout_engine``: hf, vllm)
- :mod:`.scoring`: rewards of answers (the reward model, reward functions, the overlong rule)
- :mod:`.evaluation`: greedy answers to held-out prompts, scored (training's evaluation, ``dschat-core eval``)
- :mod:`.experience`: scored answers, the unit the updates train on
- :mod:`.estimators`, :mod:`.losses`, :mod:`.tokens`: the arithmetic, pure tensor functions
"""
