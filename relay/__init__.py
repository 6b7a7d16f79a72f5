"""smtp-graph-relay: accept plain SMTP on the LAN and deliver it through Microsoft Graph sendMail."""

__version__ = "0.1.0"
