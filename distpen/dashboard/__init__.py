"""Dashboards for distpen run stores: status, a job monitor (text, HTML, live Jupyter widget) and plots.

The Dask dashboard shows tasks; these views show what a job is *about*. Everything here reads a
run store (:mod:`distpen.store`) — manifests, unit markers, ``progress.json`` and the output arrays —
so it works on a finished store, on one a job is still writing, and on an empty or absent one
(a clear message instead of a traceback).

:mod:`.status`
    :func:`status_json`, :func:`format_status`, :func:`format_status_html`, :func:`cluster_info`;
:mod:`.monitor`
    :class:`JobMonitor`;
:mod:`.plots`
    the plots of the monitor notebook.

Examples
--------
>>> from distpen.dashboard import JobMonitor, plot_firing_rates     # doctest: +SKIP
>>> mon = JobMonitor("distpen-run")                                 # doctest: +SKIP
>>> print(mon)                                                      # doctest: +SKIP
>>> plot_firing_rates("distpen-run")                                # doctest: +SKIP
"""

from .monitor import JobMonitor
from .plots import (coactivation_heatmap_data, format_latent_partners, latent_partners,
                    penalty_schedule_values, plot_clusters, plot_coactivation_heatmap, plot_firing_rates,
                    plot_newton_residuals, plot_pair_weights, plot_penalty_schedule, plot_tile_occupancy,
                    record_penalty_schedule, tile_occupancy_data)
from .status import cluster_info, format_status, format_status_html, status_json

__all__ = [
    "JobMonitor",
    "status_json",
    "format_status",
    "format_status_html",
    "cluster_info",
    "plot_coactivation_heatmap",
    "plot_clusters",
    "latent_partners",
    "format_latent_partners",
    "plot_firing_rates",
    "plot_pair_weights",
    "plot_tile_occupancy",
    "plot_newton_residuals",
    "plot_penalty_schedule",
    "penalty_schedule_values",
    "record_penalty_schedule",
    "coactivation_heatmap_data",
    "tile_occupancy_data",
]
