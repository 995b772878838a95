"""The bot's side: serving P(up), predictions, monitoring for staleness and drift, and alerts."""
