"""Reports: the report's assembly from sweep results (``assemble``: the whole report; ``build``: a condition's
and the sensitivity's sections; ``examples``: the saliency examples) and its views: the HTML page (``html``)
and the compact summary (``summary``). The typed models of the JSON contract are ``engine.schema``, below the
verdict."""
