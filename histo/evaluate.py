"""Accuracy against ground truth: matching detections to truth by position.

Used by the tests and benchmarks to compare any detector with the synthetic generator's truth
(or with a user's annotations in the same table format).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

CLASSES = ("single", "cluster", "focus")


def match_points(
    pred_xy: np.ndarray, truth_xy: np.ndarray, max_distance_um
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to true positions that minimises total distance.

    Parameters
    ----------
    pred_xy, truth_xy : ndarray, shape (N, 2) and (M, 2)
        Positions in um.
    max_distance_um : float or ndarray of shape (M,)
        Largest distance at which a prediction may match each truth point.

    Returns
    -------
    pred_index, truth_index : ndarray of int
        Matched pairs.
    """
    pred_xy = np.asarray(pred_xy, float).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, float).reshape(-1, 2)
    if len(pred_xy) == 0 or len(truth_xy) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    tol = np.broadcast_to(np.asarray(max_distance_um, float), (len(truth_xy),))
    pairs = cKDTree(truth_xy).query_ball_point(pred_xy, r=float(tol.max()))
    rows, cols, dist = [], [], []
    for i, js in enumerate(pairs):
        for j in js:
            d = float(np.hypot(*(pred_xy[i] - truth_xy[j])))
            if d <= tol[j]:
                rows.append(i)
                cols.append(j)
                dist.append(d)
    if not rows:
        return np.zeros(0, int), np.zeros(0, int)
    pi, pinv = np.unique(rows, return_inverse=True)
    ti, tinv = np.unique(cols, return_inverse=True)
    big = 1e9
    cost = np.full((len(pi), len(ti)), big)
    cost[pinv, tinv] = dist
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < big
    return pi[r[ok]], ti[c[ok]]


def precision_recall_f1(tp: int, n_pred: int, n_truth: int) -> dict:
    """Precision, recall and F1 from counts of matches, predictions and true objects.

    An empty class scores 1.0 when nothing was predicted for it and 0.0 when something was;
    nothing predicted for a non-empty class scores 0.0 throughout.

    Parameters
    ----------
    tp : int
        Predictions matched to a true object.
    n_pred, n_truth : int
        Predictions and true objects.

    Returns
    -------
    dict
        ``n_truth``, ``n_pred``, ``tp``, ``precision``, ``recall``, ``f1``.

    Examples
    --------
    >>> precision_recall_f1(8, 10, 16)["f1"]
    0.6153846153846154
    >>> precision_recall_f1(0, 0, 0)["f1"], precision_recall_f1(0, 3, 0)["f1"]
    (1.0, 0.0)
    >>> r = precision_recall_f1(0, 0, 5); r["precision"], r["recall"], r["f1"]
    (0.0, 0.0, 0.0)
    """
    precision = tp / n_pred if n_pred else (1.0 if n_truth == 0 else 0.0)
    recall = tp / n_truth if n_truth else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n_truth": n_truth,
        "n_pred": n_pred,
        "tp": tp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def evaluate_cells(pred: pd.DataFrame, truth: pd.DataFrame, distance_um: float = 5.0) -> dict:
    """Precision, recall, F1 of HER2+ cells and the relative error of their total count.

    Also the Ki67 agreement on matched cells and the Ki67+ count error when both tables have
    Ki67 status.
    """
    pi, ti = match_points(
        pred[["x_um", "y_um"]].to_numpy(), truth[["x_um", "y_um"]].to_numpy(), distance_um
    )
    out = precision_recall_f1(len(pi), len(pred), len(truth))
    out["count_error"] = (len(pred) - len(truth)) / max(len(truth), 1)
    if pred["ki67_pos"].notna().all() and len(pi):
        p = pred["ki67_pos"].to_numpy(bool)
        t = truth["ki67_pos"].to_numpy(bool)
        out["ki67_agreement"] = float(np.mean(p[pi] == t[ti]))
        out["ki67_count_error"] = (p.sum() - t.sum()) / max(int(t.sum()), 1)
    return out


def lesion_tolerance_um(truth_lesions: pd.DataFrame, distance_um: float = 6.0) -> np.ndarray:
    """Matching distance per true lesion: `distance_um`, wider for large foci (half radius)."""
    radius = np.sqrt(truth_lesions["area_um2"].to_numpy(float) / np.pi)
    return np.maximum(distance_um, 0.5 * radius)


def evaluate_lesions(
    pred: pd.DataFrame, truth: pd.DataFrame, distance_um: float = 6.0
) -> pd.DataFrame:
    """Precision, recall and F1 of lesions by class (a match needs the same class).

    Returns
    -------
    pandas.DataFrame
        Index: single, cluster, focus, all (position only, any class); columns n_truth,
        n_pred, tp, precision, recall, f1.
    """
    tol_all = lesion_tolerance_um(truth, distance_um)
    rows = {}
    for cls in CLASSES:
        p = pred[pred["class"] == cls]
        tmask = (truth["class"] == cls).to_numpy()
        t = truth[tmask]
        pi, _ = match_points(
            p[["x_um", "y_um"]].to_numpy(), t[["x_um", "y_um"]].to_numpy(), tol_all[tmask]
        )
        rows[cls] = precision_recall_f1(len(pi), len(p), len(t))
    pi, _ = match_points(
        pred[["x_um", "y_um"]].to_numpy(), truth[["x_um", "y_um"]].to_numpy(), tol_all
    )
    rows["all"] = precision_recall_f1(len(pi), len(pred), len(truth))
    return pd.DataFrame(rows).T
