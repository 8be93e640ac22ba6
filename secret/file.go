package secret

import "github.com/pullsecret/pullsecret/internal/fsutil"

// The store's file primitives are shared with the other stores.
var (
	writeFileAtomic = fsutil.WriteFileAtomic
	lockFile        = fsutil.Lock
	ensureDir       = fsutil.EnsureDir
)
