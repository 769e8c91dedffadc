"""The HTTPS door (`[http] endpoint`): one twisted.web site in the server's TLS pair.

site.py is the site every resource shares (TLS only, security headers, limits);
each feature adds its resource under its own path: unsubscribe.py serves
/unsubscribe/<token> (RFC 8058).
"""
