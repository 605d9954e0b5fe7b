"""Backend comparison, drift metrics and reports (owl3.validate): one comparison path for any two backends."""
