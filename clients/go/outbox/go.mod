module outbox-relay/clients/go/outbox

go 1.19

// Tests only: the package itself imports nothing outside the standard library.
// The driver comes from Debian's golang-github-lib-pq-dev (no module proxy needed).
require github.com/lib/pq v1.10.7

replace github.com/lib/pq => /usr/share/gocode/src/github.com/lib/pq
