"""Locust load tests of presence-gateway: Pusher-protocol users, scenarios and a headless runner.

``pusher_user`` holds the users, ``locustfile`` is locust's entry point and ``run`` starts a
local topology and gateway node(s), runs one scenario headless and prints a summary. See
``loadtests/README.md``.
"""
