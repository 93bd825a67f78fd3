"""Entries and orders: intents, the position guard, sizing and the order router."""
