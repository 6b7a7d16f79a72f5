# Why this package exists: DESIGN §10 needs a fake Microsoft that is real code with its own
# tests ("fakes, not mocks"): a local Entra ID token endpoint and Microsoft Graph sendMail over
# TLS, speaking the same wire format and validating like the real services, used both by the
# test suite and by `smtp-graph-relay sandbox`. One module per concern: pki (certificates),
# jose (JWS), directory (tenants/apps/mailboxes), access_tokens, entra (discovery + token
# endpoint), messages (pure sendMail body checks), graph (sendMail handler), faults, recorder
# (journal + mail folder), mail_index (its index.html), limits (the sending limits) and
# throttle (their enforcement), control (the /_sandbox/ API), drafts (drafts and upload
# sessions for large messages), backend (the state Entra and Graph share), server (the Sandbox that
# composes them).
"""Local stand-in for Microsoft Entra ID and Microsoft Graph sendMail.

async with Sandbox(state_dir=tmp_path) as sandbox:
    sandbox.add_app(TENANT, CLIENT_ID, secret="s3cret")
    sandbox.add_mailbox("scanner@contoso.com")
    ...  # MSAL authority f"{sandbox.authority_host}/{TENANT}", trust sandbox.ca_file
    mails = await sandbox.wait_for_mail(1)
"""

from .faults import ABORT, FaultPlan, GraphFault, TokenOutage
from .graph import MAILBOX_CONCURRENCY, MAX_REQUEST_BYTES
from .limits import Ndr, SandboxLimits
from .recorder import ReceivedMail, UploadedAttachment
from .server import Sandbox

__all__ = [
    "ABORT",
    "MAILBOX_CONCURRENCY",
    "MAX_REQUEST_BYTES",
    "FaultPlan",
    "GraphFault",
    "Ndr",
    "ReceivedMail",
    "Sandbox",
    "SandboxLimits",
    "TokenOutage",
    "UploadedAttachment",
]
