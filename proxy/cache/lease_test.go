package cache_test

import (
	"testing"

	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/proxy/cache/cachetest"
)

// TestMemoryLeasesContract: the in-memory lease table meets the contract
// the PostgreSQL one does (postgres.Leases); its replicas share one value.
func TestMemoryLeasesContract(t *testing.T) {
	t.Parallel()
	cachetest.TestLeases(t, func(t *testing.T, n int) []cache.Leases {
		l := cache.NewMemoryLeases(nil)
		out := make([]cache.Leases, n)
		for i := range out {
			out[i] = l
		}
		return out
	})
}
