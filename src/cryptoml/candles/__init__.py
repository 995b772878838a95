"""Candles in: the offline synthetic source, a CSV, or an exchange through ccxt; validated and stored."""
