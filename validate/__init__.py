"""Backend comparison, drift metrics and reports (owl3.validate). Built in the validator issue."""
