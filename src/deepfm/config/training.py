"""The ``model`` section (DeepFM's shape) and the ``train`` section (optimiser, schedule, early stopping,
precision, checkpoints)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from deepfm.config.base import Frozen


class ModelConfig(Frozen):
    embed_dim: int = Field(16, gt=0)
    hidden_units: list[Annotated[int, Field(gt=0)]] = [400, 400, 400]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    use_linear: bool = True
    use_fm: bool = True
    use_deep: bool = True
    # "sum": the paper, y = bias + sum(linear) + sum(bi-interaction) + dnn.
    # "project": the seed note, linear and FM vectors each go through a dense layer to one logit.
    head: Literal["sum", "project"] = "sum"
    init_std: float = Field(1e-4, gt=0.0)
    # DNN weights: "xavier_uniform" (default), "xavier_normal" as FuxiCTR/BARS, or "normal" N(0, dnn_init_std)
    # as DeepCTR (the DNN starts near 0: better on validation for ~8k-row sets, worse at 2M rows and in one
    # epoch; bench/quality/SWEEP.md)
    dnn_init: Literal["normal", "xavier_normal", "xavier_uniform"] = "xavier_uniform"
    dnn_init_std: float = Field(1e-4, gt=0.0)

    @model_validator(mode="after")
    def _some_part(self) -> ModelConfig:
        if not (self.use_linear or self.use_fm or self.use_deep):
            raise ValueError("at least one of use_linear, use_fm, use_deep must be true")
        return self


def auto_batch_size(train_rows: int) -> int:
    """``batch_size: auto``: 4096 from 409,600 training rows up; smaller data gets ~100+ steps per epoch (the
    largest power of two <= rows / 100, at least 256). bench/quality/SWEEP.md: on 7-8k-row sets batch 4096
    lost 0.06 validation AUC against 256."""
    return min(4096, max(256, 1 << max(0, (train_rows // 100).bit_length() - 1)))


class TrainConfig(Frozen):
    # rows per step (the global batch under torchrun); "auto": see auto_batch_size
    batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    eval_batch_size: int = Field(16384, gt=0)
    epochs: int = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0)
    optimizer: Literal["adam", "adagrad", "proximal_adagrad"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    # sparse embedding gradients: only the rows a batch touches are updated (SparseAdam / sparse Adagrad)
    sparse: bool = True
    embedding_l2: float = Field(0.0, ge=0.0)
    # "batch": embedding_l2 * sum of the squared rows a batch looked up / batch size (cheap with sparse
    # updates; a row is pulled towards 0 as often as it is seen). "table": embedding_l2 / 2 * ||W||^2 over the
    # whole table every step, as FuxiCTR/BARS (needs sparse: false; applied as Adam/Adagrad weight decay).
    embedding_l2_scope: Literal["batch", "table"] = "batch"
    weight_decay: float = Field(0.0, ge=0.0)
    # clip the global gradient norm (all parameters, the embedding table included) to this value, as
    # FuxiCTR's max_gradient_norm (BARS: 10); None = no clipping
    grad_clip_norm: float | None = Field(None, gt=0.0)
    # what early stopping, best-epoch selection and learning-rate reduction watch on the validation split:
    # "auc", or "auc-logloss" (AUC minus log loss, FuxiCTR's monitor {AUC: 1, logloss: -1})
    monitor: Literal["auc", "auc-logloss"] = "auc"
    l1: float = Field(0.0, ge=0.0)
    l2: float = Field(0.0, ge=0.0)
    patience: int = Field(2, ge=0)
    # an epoch counts as a gain only when the monitored validation score beats the best by more than this
    # (Keras / PyTorch Lightning's min_delta); 0 = any gain
    min_delta: float = Field(0.0, ge=0.0)
    lr_plateau_factor: float = Field(0.1, gt=0.0, le=1.0)
    lr_plateau_patience: int = Field(0, ge=0)
    min_lr: float = Field(1e-6, ge=0.0)
    seed: int = 2017
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    num_threads: int | None = Field(None, gt=0)
    # CPU + glibc: `deepfm train` keeps freed memory in the process for reuse (mallopt) instead of returning
    # each step's buffers to the OS and page-faulting them back in; resident memory stays at its peak. It is
    # process-wide, so the command applies it, not the Trainer (deepfm.process.reuse_freed_memory)
    reuse_freed_memory: bool = True
    shuffle: bool = True
    shuffle_block_rows: int = Field(32, gt=0)
    checkpoint_every_steps: int = Field(1000, gt=0)
    prefetch_batches: int = Field(4, ge=1)
    progress: bool = True
    # write the optimisers' state into the model directory, so that `train --init-from` continues it
    save_optimizer_state: bool = True
    # under torchrun: a rank that waits longer than this for the others fails instead of hanging
    dist_timeout_s: float = Field(1800.0, gt=0)
    # under torchrun: "replicated" (every rank holds the whole embedding table and its optimiser state) or
    # "row" (each rank holds a contiguous 1/N of the rows and their state; rows travel by all-to-all)
    embedding_sharding: Literal["replicated", "row"] = "replicated"

    @model_validator(mode="after")
    def _opt(self) -> TrainConfig:
        if (self.l1 or self.l2) and self.optimizer != "proximal_adagrad":
            raise ValueError("train.l1 / train.l2 are the proximal_adagrad optimiser's; "
                             "use embedding_l2 or weight_decay with adam/adagrad")
        if self.embedding_l2_scope == "table" and (self.sparse or self.optimizer == "proximal_adagrad"):
            raise ValueError("embedding_l2_scope: table penalises every row at every step, which needs dense "
                             "updates: set train.sparse: false (optimizer adam or adagrad), or use scope batch")
        if self.embedding_sharding == "row" and not self.sparse:
            raise ValueError("embedding_sharding: row updates only the rows each owner receives, which needs "
                             "sparse updates: set train.sparse: true")
        return self
