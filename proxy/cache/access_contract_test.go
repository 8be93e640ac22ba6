package cache_test

import (
	"path/filepath"
	"testing"

	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/proxy/cache/cachetest"
)

// TestAccessRecordsContract: the records of one process, in memory and
// persisted to a file, meet the contract the PostgreSQL table does.
func TestAccessRecordsContract(t *testing.T) {
	t.Parallel()
	t.Run("memory", func(t *testing.T) {
		t.Parallel()
		cachetest.TestAccessRecords(t, func(t *testing.T, n int) []cache.AccessRecords {
			return same(cache.NewAccessRecords(), n)
		})
	})
	t.Run("file", func(t *testing.T) {
		t.Parallel()
		cachetest.TestAccessRecords(t, func(t *testing.T, n int) []cache.AccessRecords {
			r, err := cache.OpenAccessRecords(filepath.Join(t.TempDir(), "access.json"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close() })
			return same(r, n)
		})
	})
}

func same(r cache.AccessRecords, n int) []cache.AccessRecords {
	out := make([]cache.AccessRecords, n)
	for i := range out {
		out[i] = r
	}
	return out
}
