"""Market data for backtests: download from the venue, read the files users already have.

Modules, one job each:

* ``layout``: where ``pyquant data download`` puts a series (``SYMBOL_INTERVAL_KIND.parquet``)
  and the resume manifest beside it (the spans already fetched, the exchange's own gaps).
* ``download``: pages a venue's REST klines into that layout, resuming without duplicates.
* ``formats``: reads freqtrade data files, Binance public-data archives and our own
  CSV/Parquet into the canonical klines frame ``pyquant.backtest`` validates.
* ``cli``: ``pyquant data download`` and ``pyquant data exchange-info``.
"""
