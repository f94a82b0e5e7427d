"""The dashboard builder: selectors and PromQL (promql.py), panels (panels.py), the dashboard frame
and its variables (frame.py), and one module per dashboard, each a list of panels.

Adding a dashboard: a module with FILE (the JSON file name) and build(q) -> dict, listed in
grafana/build_dashboards.py's DASHBOARDS.
"""
