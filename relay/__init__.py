"""smtp-graph-relay: accept plain SMTP on the LAN, deliver it through Microsoft Graph sendMail."""

__version__ = "0.1.0"
