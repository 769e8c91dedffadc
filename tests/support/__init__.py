"""Helpers for the tests: real peers and drivers run as subprocesses.

sink.py is a programmable SMTP server, peers.py its handle (Sink) and throwaway
TLS material, client_driver.py runs mailhost's SMTP client in a fresh process.
"""
