"""Per-directory features for the hotness model (shared by training, the simulator and the agent).

The unit is a day-directory (`MODALITY/YYYY-MM-DD`, i.e. department/modality × acquisition day, the level at which the
PACS tree is listed and prefetched). For each directory and each of the last `WINDOW` days the model sees one feature
vector (`FEATURES`); it predicts log1p(reads in the next 24 h). The access log aggregation is a (directory × day) matrix
of read counts: the agent keeps it in its catalog, the simulator builds it from the trace.
"""

from __future__ import annotations

import numpy as np

WINDOW = 30
# Counts are per file of the directory (x READ_SCALE), so one model serves a 1 TB/month clinic and a
# 5 TB/month hospital alike: a bigger site has proportionally more files per day-directory.
READ_SCALE = 10.0
FEATURES = [
    "log1p_reads_per_file",   # log1p(READ_SCALE * reads that day / files in the directory)
    "weekday_sin",        # day of week of that day (cyclic)
    "weekday_cos",
    "weekend",            # 1 on Saturday/Sunday
    "log_age",            # log1p(days since the directory's acquisition day) / 8
    "exists",             # 0 before the directory's acquisition day
    "modality",           # modality code / number of modalities
]
N_FEATURES = len(FEATURES)


def window_features(counts: np.ndarray, day: int, dir_day: np.ndarray, dir_mod: np.ndarray,
                    n_modalities: int, start_weekday: int, dir_files: np.ndarray,
                    window: int = WINDOW) -> np.ndarray:
    """(n_dirs, window, N_FEATURES) float32 for predicting day `day` from days day-window … day-1.

    counts: (n_dirs, n_days) read counts, day 0 = the first day of `counts`; days before 0 are zeros.
    dir_day: acquisition day of each directory on the same day axis; dir_mod: modality code;
    dir_files: number of files in each directory.
    """
    n = counts.shape[0]
    days = np.arange(day - window, day)
    c = np.zeros((n, window), dtype=np.float32)
    valid = (days >= 0) & (days < counts.shape[1])
    c[:, valid] = counts[:, days[valid]]
    wd = (start_weekday + days) % 7
    ang = 2 * np.pi * wd / 7
    age = days[None, :] - dir_day[:, None]
    x = np.empty((n, window, N_FEATURES), dtype=np.float32)
    x[:, :, 0] = np.log1p(READ_SCALE * c / np.maximum(dir_files, 1)[:, None])
    x[:, :, 1] = np.sin(ang)[None, :]
    x[:, :, 2] = np.cos(ang)[None, :]
    x[:, :, 3] = (wd >= 5)[None, :]
    x[:, :, 4] = np.log1p(np.maximum(age, 0)) / 8.0
    x[:, :, 5] = age >= 0
    x[:, :, 6] = (dir_mod / max(n_modalities, 1))[:, None]
    return x


def daily_counts(t: np.ndarray, dirs: np.ndarray, n_dirs: int, n_days: int) -> np.ndarray:
    """(n_dirs, n_days) counts of reads; t in seconds from day 0."""
    day = np.clip((t // 86_400).astype(np.int64), 0, n_days - 1)
    out = np.zeros((n_dirs, n_days), dtype=np.float32)
    np.add.at(out, (dirs, day), 1.0)
    return out


def target(next_day_reads: np.ndarray, dir_files: np.ndarray) -> np.ndarray:
    """What the model predicts: log1p(READ_SCALE * reads in the next 24 h / files)."""
    y: np.ndarray = np.log1p(READ_SCALE * next_day_reads / np.maximum(dir_files, 1)).astype(np.float32)
    return y


def reads_from_target(y: np.ndarray, dir_files: np.ndarray) -> np.ndarray:
    reads: np.ndarray = np.maximum(np.expm1(y), 0.0) / READ_SCALE * np.maximum(dir_files, 1)
    return reads
