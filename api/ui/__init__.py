"""The dashboard at `/ui`: one static page and its script, served from the package (no CDN,
no build step). The page talks to the same HTTP API as every other client, with the key the
user signs in with, kept in the browser tab's session storage and never in a URL."""
