"""Talking to a Binance-compatible USDⓈ-M futures venue: REST client, error codes, streams."""
