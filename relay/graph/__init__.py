"""Microsoft Graph and Entra ID: the HTTP client, MSAL tokens, Graph errors as our own."""
