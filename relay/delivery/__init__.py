"""Delivery: carry out the core's decisions against the store and Graph.

The engine (modes), workers (the queue), attempts, mailbox slots and bounces.
"""
