"""Median, min and max per metric, and ratios between VMMs' medians."""

import statistics


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "runs": len(values)}


def ratio(mine, theirs):
    """mine/theirs of two summaries' medians; None where either is missing or theirs is 0
    (then both are reported as they are)."""
    if not mine or not theirs or theirs["median"] == 0:
        return None
    return round(mine["median"] / theirs["median"], 3)
