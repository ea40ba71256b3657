"""Serving on several engine replicas: Ray actors behind the core router, prefill/decode with KV transfer.

``replica.py`` is the Ray actor around one engine, ``frontend.py`` the
``ClusterEngine`` the HTTP server talks to (the same face as the
single-process ``AsyncEngine``), ``pd.py`` the prefill-to-decode handoff,
``kv.py`` the KV blocks as arrays, ``metrics.py`` the per-replica metrics,
``launch.py`` how a cluster starts. Ray is imported only here, and only when
a cluster is asked for: ``pip install 'tokenmill[cluster]'``.
"""
