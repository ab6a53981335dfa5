"""Runners: loops that own a queue each (claim, deliver, retry, set aside, log)."""
