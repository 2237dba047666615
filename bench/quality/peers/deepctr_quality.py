#!/usr/bin/env python3
"""DeepCTR-Torch DeepFM, multi-epoch quality runner.  Run with bench/.envs/deepctr/bin/python.

Same preprocessing as bench/peers/run_deepctr.py (the library's Criteo example), generalised to any
schema: categorical columns fillna('-1') + LabelEncoder fitted on train (unseen -> 0), numeric columns
fillna(0) + MinMaxScaler fitted on train.  Model: deepctr_torch.models.DeepFM(linear=dnn=features,
dnn_hidden_units=(400, 400, 400)), library defaults otherwise (l2_reg_embedding=1e-5, init_std=1e-4, ...).
Training: model.compile('adam', 'binary_crossentropy', metrics=['auc']); model.fit(..., epochs=E,
validation_data=valid, callbacks=[EarlyStopping(monitor='val_auc', mode='max', patience=P),
ModelCheckpoint(monitor='val_auc', mode='max', save_best_only=True, save_weights_only=True)]) -- the
library's own early stopping and best-epoch checkpoint; the best weights are loaded before testing.
"""
import os
import tempfile

import _qcommon as q
import numpy as np
import pandas as pd


def main():
    args = q.parser(__doc__.splitlines()[0]).parse_args()
    t0 = q.setup(args)
    import torch
    import deepctr_torch
    from deepctr_torch.callbacks import EarlyStopping, ModelCheckpoint
    from deepctr_torch.inputs import DenseFeat, SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM
    from sklearn.preprocessing import LabelEncoder, MinMaxScaler

    sc = q.schema(args)
    label, num, cat = sc["label"], sc["numeric"], sc["categorical"]
    dtypes = {label: np.float32, **{c: np.float64 for c in num}, **{c: str for c in cat}}
    frames = {s: pd.read_csv(q.path(args, s), sep="\t", dtype=dtypes, keep_default_na=False,
                             na_values={c: [""] for c in num}) for s in ("train", "valid", "test")}
    for df in frames.values():
        df[cat] = df[cat].replace("", "-1")
        if num:
            df[num] = df[num].fillna(0)
    vocab = {}
    tr = frames["train"]
    for feat in cat:
        lbe = LabelEncoder()
        tr[feat] = lbe.fit_transform(tr[feat]) + 1
        classes = lbe.classes_
        for s in ("valid", "test"):
            v = frames[s][feat].to_numpy()
            pos = np.minimum(np.searchsorted(classes, v), len(classes) - 1)
            frames[s][feat] = np.where(classes[pos] == v, pos + 1, 0)
        vocab[feat] = len(classes) + 1
    if num:
        mms = MinMaxScaler(feature_range=(0, 1))
        tr[num] = mms.fit_transform(tr[num])
        for s in ("valid", "test"):
            frames[s][num] = mms.transform(frames[s][num])
    cols = [SparseFeat(f, vocab[f], embedding_dim=args.embedding_dim) for f in cat] + [DenseFeat(f, 1) for f in num]
    names = get_feature_names(cols + cols)
    xs = {s: {n: frames[s][n].values for n in names} for s in frames}
    ys = {s: frames[s][label].values for s in frames}

    model = DeepFM(linear_feature_columns=cols, dnn_feature_columns=cols, task="binary",
                   dnn_hidden_units=(400, 400, 400), device="cpu", seed=args.seed)
    model.compile("adam", "binary_crossentropy", metrics=["auc"])
    for g in model.optim.param_groups:
        g["lr"] = args.lr
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "best.pt")
        hist = model.fit(xs["train"], ys["train"], batch_size=args.batch_size, epochs=args.epochs, verbose=0,
                         validation_data=(xs["valid"], ys["valid"]),
                         callbacks=[EarlyStopping(monitor="val_auc", mode="max", patience=args.patience),
                                    ModelCheckpoint(ckpt, monitor="val_auc", mode="max", save_best_only=True,
                                                    save_weights_only=True, verbose=0)])
        model.load_state_dict(torch.load(ckpt))
    val_auc = hist.history.get("val_auc", [])
    best_epoch = int(np.argmax(val_auc)) + 1 if val_auc else None
    pv = model.predict(xs["valid"], batch_size=4096)
    pt = model.predict(xs["test"], batch_size=4096)
    q.finish("deepctr-torch", deepctr_torch.__version__, args, t0, ys["valid"], pv, ys["test"], pt,
             best_epoch=best_epoch, epochs_run=len(val_auc))


if __name__ == "__main__":
    main()
