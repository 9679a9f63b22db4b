"""attnscope.dashboards."""
