"""The trading desk: intents, the position guard, sizing, the order router, legs and the journal."""
