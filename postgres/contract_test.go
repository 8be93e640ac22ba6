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

func TestTokensContract(t *testing.T) {
	t.Parallel()
	proxytest.TestTokenBackend(t, func(t *testing.T, n int) []proxy.TokenBackend {
		var out []proxy.TokenBackend
		for _, db := range handles(t, n) {
			out = append(out, db.Tokens())
		}
		return out
	})
}

func TestSecretsContract(t *testing.T) {
	t.Parallel()
	secrettest.TestBackend(t, func(t *testing.T, n int) []secret.Backend {
		var out []secret.Backend
		for _, db := range handles(t, n) {
			out = append(out, db.Secrets())
		}
		return out
	})
}

func TestAccessRecordsContract(t *testing.T) {
	t.Parallel()
	cachetest.TestAccessRecords(t, func(t *testing.T, n int) []cache.AccessRecords {
		var out []cache.AccessRecords
		for _, db := range handles(t, n) {
			out = append(out, db.AccessRecords())
		}
		return out
	})
}

func TestLeasesContract(t *testing.T) {
	t.Parallel()
	cachetest.TestLeases(t, func(t *testing.T, n int) []cache.Leases {
		var out []cache.Leases
		for _, db := range handles(t, n) {
			out = append(out, db.Leases())
		}
		return out
	})
}
