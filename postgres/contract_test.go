package postgres

import (
	"testing"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/proxy/cache/cachetest"
	"github.com/pullsecret/pullsecret/proxy/proxytest"
	"github.com/pullsecret/pullsecret/secret"
	"github.com/pullsecret/pullsecret/secret/secrettest"
)

// The contracts the embedded files meet, met by the tables; every handle
// is a pool of its own, as every replica has.

// each is get of n handles on one database.
func each[T any](t *testing.T, n int, get func(*DB) T) []T {
	var out []T
	for _, db := range handles(t, n) {
		out = append(out, get(db))
	}
	return out
}

func TestTokensContract(t *testing.T) {
	t.Parallel()
	proxytest.TestTokenBackend(t, func(t *testing.T, n int) []proxy.TokenBackend {
		return each(t, n, func(db *DB) proxy.TokenBackend { return db.Tokens() })
	})
}

func TestSecretsContract(t *testing.T) {
	t.Parallel()
	secrettest.TestBackend(t, func(t *testing.T, n int) []secret.Backend {
		return each(t, n, func(db *DB) secret.Backend { return db.Secrets() })
	})
}

func TestAccessRecordsContract(t *testing.T) {
	t.Parallel()
	cachetest.TestAccessRecords(t, func(t *testing.T, n int) []cache.AccessRecords {
		return each(t, n, func(db *DB) cache.AccessRecords { return db.AccessRecords() })
	})
}

func TestLeasesContract(t *testing.T) {
	t.Parallel()
	cachetest.TestLeases(t, func(t *testing.T, n int) []cache.Leases {
		return each(t, n, func(db *DB) cache.Leases { return db.Leases() })
	})
}
