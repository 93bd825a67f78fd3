"""Notifications: the daemon's events to Telegram, Discord and generic JSON webhooks.

Modules, one job each:

* ``documents``: the desk's notes and the router's order changes as events-stream documents
  (the schema of ``pyquant/scale/events.schema.json``) and the notification each one is.
* ``messages``: a burst of documents as one short text message.
* ``targets``: the three kinds of target: request, secret, and the ``retry_after`` of a 429.
* ``delivery``: the ``Notifier``: bounded queues, coalescing, retries, drops counted; the
  feed-down watch and the daily summary.
* ``hook``: the few lines that tap a running daemon.
* ``cli``: ``pyquant notify test``.

Delivery never runs on the trading path: the daemon's callbacks only append to a bounded
queue; sending happens in background tasks.
"""
