"""Reports: the JSON report (``build``) and its HTML rendering (``html``)."""
