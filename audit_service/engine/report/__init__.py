"""Reports: the typed models of the JSON contract (``model``), the report's assembly from sweep results
(``build``), and its views: the HTML page (``html``) and the compact summary (``summary``)."""
