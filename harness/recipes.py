"""The official DynamicViT training recipes, as named presets beneath every spec.

A run's `recipe` picks one preset; its values sit beneath the spec (base, scale, stage,
variant and command-line values all win over it), so a spec that says nothing trains exactly as
the official code did, and a spec that says something changes only that. The engine never asks
which recipe a run came from: the preset fills ordinary config fields, including the ones that
select the official learning-rate rule (`optim.sched`, `optim.backbone_lr_rule`,
`optim.predictor_decay`), which `harness/optim.py` implements.

Sources, in raoyongming/DynamicViT (every value below names its file and line):
- `dynamicvit-2021`: the NeurIPS 2021 code, `main_dynamic_vit.py`, `engine.py`, `samplers.py`,
  `vit.py` and `losses.py` as of the last commit that still had them (the parent of dd32af9,
  "release"), run with the 2021 README's command
  `--arch deit_small --batch-size 96 --epochs 30 --dist-eval --distill --base_rate 0.7` on 8 GPUs.
  The paper's numbers (Tables 1-4) came from this code.
- `dynamicvit-tpami`: the repository's HEAD (T-PAMI extension), `main.py`, `utils.py`,
  `optim_factory.py`, `engine.py`, `losses.py`, `models/dyvit.py`, run with its README's DeiT-S
  command (README.md line 127):
  `--model deit-s --batch_size 128 --epochs 30 --base_rate 0.7 --lr 1e-3 --warmup_epochs 5` on 8 GPUs.
- `dynamicvit-tpami-spatial`: HEAD again, for DynamicSwin and DynamicCNN (Swin / ConvNeXt), run
  with its README's 8-GPU commands (README.md:155, 169, 183, 197, 211, 225), e.g.
  `--model swin-t --batch_size 128 --epochs 120 --base_rate 0.7 --lr 4e-3 --drop_path 0.2
  --update_freq 4 --lr_scale 0.2`: gradient accumulation over 4 micro-batches (`train.accum_steps`).

Not presets because both codes agree and the config's defaults already say so: AdamW with eps
1e-8 (main_dynamic_vit.py:55, main.py:70), pruning locations [3, 6, 9] and keep ratios
[rho, rho^2, rho^3] (main_dynamic_vit.py:287-291, main.py:337-338), hard Gumbel-softmax at tau 1
(vit.py:437, models/dyvit.py:437 `F.gumbel_softmax(..., hard=True)`), the predictors' init (trunc normal
std 0.02, zero biases: vit.py:396-405, models/dyvit.py:396-405; applied by the model in every
recipe), the eval transform (resize 256/224 bicubic, centre crop).
"""

from __future__ import annotations

import copy
from typing import Any

DEFAULT_RECIPE = "dynamicvit-tpami"

RECIPES: dict[str, dict[str, Any]] = {
    "dynamicvit-2021": {
        "train": {
            "batch_size": 96,  # README (2021) command: --batch-size 96 per GPU, 8 GPUs -> global 768
            "epochs": 30,  # README (2021) command: --epochs 30
            "precision": "fp16",  # engine.py:38 torch.cuda.amp.autocast() + main_dynamic_vit.py:442 NativeScaler
            "ema": 0.99996,  # main_dynamic_vit.py:46-49 model_ema on, --model-ema-decay 0.99996 (kept, not evaluated)
            "repeated_aug": True,  # main_dynamic_vit.py:102-104 repeated_aug on; :240-243 RASampler (samplers.py)
        },
        "optim": {
            "lr": 5e-4,  # main_dynamic_vit.py:68 --lr 5e-4
            "lr_base_batch": 512,  # main_dynamic_vit.py:425 lr x batch x world / 512 (7.5e-4 at 768)
            "min_lr": 1e-5,  # main_dynamic_vit.py:78 --min-lr 1e-5
            "warmup_epochs": 0,  # main_dynamic_vit.py:83 --warmup-epochs 0; :200-215 has no warm-up
            "warmup_lr": 0.0,  # unused without warm-up
            "sched": "epoch",  # main_dynamic_vit.py:503 adjust_learning_rate once per epoch, cos(pi epoch / epochs)
            "backbone_lr_scale": 0.01,  # main_dynamic_vit.py:208 init_lr * 0.01
            "backbone_lr_rule": "min",  # main_dynamic_vit.py:208 backbone lr = min(init_lr * 0.01, cosine)
            "backbone_freeze_epochs": 5,  # main_dynamic_vit.py:502 warmup_step = 5; :205-206 backbone lr 0 before
            "weight_decay": 0.05,  # main_dynamic_vit.py:63 --weight-decay 0.05
            "predictor_decay": "all",  # main_dynamic_vit.py:182-183 every predictor parameter in the decayed group
            "clip_grad": None,  # main_dynamic_vit.py:59 --clip-grad None
            "freeze": ["cls_token", "pos_embed"],  # main_dynamic_vit.py:187-188 left out of the optimiser
        },
        "aug": {
            "auto_augment": "rand-m9-mstd0.5-inc1",  # main_dynamic_vit.py:95 --aa
            "mixup": 0.8,  # main_dynamic_vit.py:117 --mixup 0.8
            "cutmix": 1.0,  # main_dynamic_vit.py:119 --cutmix 1.0
            "label_smoothing": 0.1,  # main_dynamic_vit.py:98 --smoothing 0.1
            "random_erasing": 0.25,  # main_dynamic_vit.py:107 --reprob 0.25
        },
        "model": {
            "drop_path": 0.0,  # main_dynamic_vit.py:290-297 --drop-path is not passed; vit.py:324 default 0
        },
        "losses": {
            "cls": {"weight": 1.0},  # main_dynamic_vit.py:466 clf_weight=1.0
            "ratio": {"weight": 2.0},  # main_dynamic_vit.py:40 --ratiow 2.0
            "kl": {"weight": 0.5},  # main_dynamic_vit.py:39 --distillw 0.5 (losses.py: the KL term)
            "token": {
                "weight": 0.5
            },  # main_dynamic_vit.py:39,466 mse_token=True, distill_weight 0.5 (losses.py: token MSE)
        },
        "gumbel": {"tau": 1.0},  # vit.py:437 F.gumbel_softmax(pred_score, hard=True), default tau 1
    },
    "dynamicvit-tpami": {
        "train": {
            "batch_size": 128,  # README.md:127 --batch_size 128 per GPU, 8 GPUs -> global 1024
            "epochs": 30,  # README.md:127 --epochs 30
            "precision": "fp32",  # main.py:185 --use_amp False: engine.py:54-60 full precision
            "ema": 0.9999,  # main.py:62-63 model_ema True, --model_ema_decay 0.9999; :583-592 evaluated too
            "repeated_aug": False,  # main.py:218-219 DistributedSampler (RASampler imported, unused)
        },
        "optim": {
            "lr": 1e-3,  # README.md:127 --lr 1e-3
            "lr_base_batch": None,  # main.py:485-487 the lr is used as given, never rescaled by batch size
            "min_lr": 1e-6,  # main.py:87 --min_lr 1e-6
            "warmup_epochs": 5,  # README.md:127 --warmup_epochs 5
            "warmup_lr": 0.0,  # utils.py:433 start_warmup_value=0 (linear from 0, utils.py:440)
            "sched": "step",  # utils.py:432-449 cosine_scheduler per iteration; engine.py:36-44 set every step
            "backbone_lr_scale": 0.01,  # main.py:189 --lr_scale 0.01 -> optim_factory.py:106-111 lr_scale
            "backbone_lr_rule": "scale",  # engine.py:44 lr = schedule[it] * lr_scale
            "backbone_freeze_epochs": 5,  # optim_factory.py:107,110 fix_step = 5; engine.py:41-42 lr 0 before
            "weight_decay": 0.05,  # main.py:78 --weight_decay 0.05 (constant: weight_decay_end None, main.py:522-525)
            "predictor_decay": "matrices",  # optim_factory.py:82-88 predictor 1-D params and biases get no decay
            "clip_grad": None,  # main.py:74 --clip_grad None
            "freeze": ["cls_token", "pos_embed"],  # optim_factory.py:80-81 left out of the optimiser
        },
        "aug": {
            "auto_augment": "rand-m9-mstd0.5-inc1",  # main.py:97 --aa
            "mixup": 0.8,  # main.py:118 --mixup 0.8
            "cutmix": 1.0,  # main.py:120 --cutmix 1.0
            "label_smoothing": 0.1,  # main.py:99 --smoothing 0.1
            "random_erasing": 0.25,  # main.py:108 --reprob 0.25
        },
        "model": {
            "drop_path": 0.0,  # main.py:54 --drop_path 0 (DeiT-B: 0.2, README.md:133)
        },
        "losses": {
            "cls": {"weight": 1.0},  # main.py:425 clf_weight=1.0
            "ratio": {"weight": 2.0},  # main.py:191 --ratio_weight 2.0 (DeiT-B: 5.0, README.md:133)
            "kl": {"weight": 0.5},  # main.py:425 distill_weight=0.5 (losses.py DistillDiffPruningLoss_dynamic: KL)
            "token": {"weight": 0.5},  # main.py:425 mse_token=True, distill_weight=0.5 (losses.py: token MSE)
        },
        "gumbel": {"tau": 1.0},  # models/dyvit.py:437 F.gumbel_softmax(pred_score, hard=True), default tau 1
    },
    "dynamicvit-tpami-spatial": {  # DynamicSwin / DynamicCNN (ConvNeXt): HEAD main.py, README.md:150-232
        "train": {
            "batch_size": 128,  # README.md:155 --batch_size 128 per GPU, 8 GPUs
            "accum_steps": 4,  # README.md:155 --update_freq 4 -> global batch 128 x 8 x 4 = 4096 (main.py:485)
            "epochs": 120,  # README.md:155 --epochs 120
            "precision": "fp32",  # main.py:185 --use_amp False: engine.py:58-60 full precision
            "ema": 0.9999,  # main.py:62-63 model_ema True, --model_ema_decay 0.9999; :583-592 evaluated too
            "repeated_aug": False,  # main.py:218-219 DistributedSampler
        },
        "optim": {
            "lr": 4e-3,  # README.md:155 --lr 4e-3 (main.py:84 default, "with total batch size 4096")
            "lr_base_batch": None,  # main.py:485-487 the lr is used as given, never rescaled by batch size
            "min_lr": 1e-6,  # main.py:87 --min_lr 1e-6
            "warmup_epochs": 20,  # main.py:89 default 20: the README commands do not pass --warmup_epochs
            "warmup_lr": 0.0,  # utils.py:433 start_warmup_value=0 (linear from 0, utils.py:440)
            "sched": "step",  # utils.py:432-449 per update (engine.py:34-44 it = data_iter_step // update_freq)
            "backbone_lr_scale": 0.2,  # README.md:155 --lr_scale 0.2 -> optim_factory.py:106-111 lr_scale
            "backbone_lr_rule": "scale",  # engine.py:44 lr = schedule[it] * lr_scale
            "backbone_freeze_epochs": 5,  # optim_factory.py:107,110 fix_step = 5; engine.py:41-42 lr 0 before
            "weight_decay": 0.05,  # main.py:78 --weight_decay 0.05 (constant: weight_decay_end None, main.py:522-525)
            "predictor_decay": "matrices",  # optim_factory.py:82-89 new params (fast, predictor): 1-D, biases undecayed
            "clip_grad": None,  # main.py:74 --clip_grad None
            "freeze": ["cls_token", "pos_embed"],  # optim_factory.py:80-81 (Swin and ConvNeXt have neither)
        },
        "aug": {
            "auto_augment": "rand-m9-mstd0.5-inc1",  # main.py:97 --aa
            "mixup": 0.8,  # main.py:118 --mixup 0.8
            "cutmix": 1.0,  # main.py:120 --cutmix 1.0
            "label_smoothing": 0.1,  # main.py:99 --smoothing 0.1
            "random_erasing": 0.25,  # main.py:108 --reprob 0.25
        },
        "model": {
            "drop_path": 0.2,  # README.md:155,169,197,211 --drop_path 0.2 (ConvNeXt-B, Swin-B: 0.5, README.md:183,225)
        },
        "losses": {
            "cls": {"weight": 1.0},  # main.py:414,417 clf_weight=1.0
            "ratio": {"weight": 10.0},  # main.py:415,418 ratio_weight=10.0
            "kl": {"weight": 0.5},  # losses.py:12,70 distill_weight=0.5 on the logit KL
            "token": {"weight": 0.5},  # losses.py:67,70 distill_weight=0.5 on the MSE of the whole final map
        },
        "gumbel": {"tau": 1.0},  # dyswin.py:267, dyconvnext.py:218 F.gumbel_softmax(pred_score, hard=True), tau 1
    },
}


def preset(name: str) -> dict[str, Any]:
    """A fresh copy of the recipe's values (nested like RunConfig); KeyError for an unknown name."""
    return copy.deepcopy(RECIPES[name])
