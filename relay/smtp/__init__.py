"""The SMTP shell: aiosmtpd sessions, the handler that turns decisions into replies, AUTH."""
