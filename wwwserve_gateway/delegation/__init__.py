"""Delegation: an entry node hands an app's request to a peer over the overlay and relays the answer.

- `wire`: the delegated request and the items an executor streams back, and their checks.
- `executor`: the overlay handler that serves (or relays onward) a peer's request.
- `entry`: tries the router's candidates in order and relays the answer, with failover.
- `continuation`: resuming a broken stream at another executor from the text already sent.
- `dispatch`: the policy's decision for each app request: local, delegate, retry or reject.
"""
