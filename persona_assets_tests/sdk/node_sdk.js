// Segment's Node SDK (@segment/analytics-node), unmodified but for its host: one person's calls.
// Usage: node node_sdk.js <server url> <write key> <userId> <anonymousId> <email>
const { Analytics } = require('@segment/analytics-node')

const [url, writeKey, userId, anonymousId, email] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host: url, flushInterval: 200, maxRetries: 3 })
const failures = []
analytics.on('error', (err) => failures.push(String(err && (err.reason || err.code || err))))

analytics.identify({ userId, anonymousId, traits: { email, first_name: 'Noa', country: 'DE' } })
analytics.page({ userId, anonymousId, name: 'Home', properties: { url: 'https://shop.example/' } })
for (let i = 0; i < 3; i++) {
  analytics.track({ userId, anonymousId, event: 'Product Viewed',
    properties: { product_id: `p${i}`, category: 'garden', price: 12.5 } })
}
analytics.track({ userId, anonymousId, event: 'Order Completed',
  properties: { order_id: 'o-node-1', revenue: 25, products: [{ product_id: 'p1', category: 'garden', price: 12.5, quantity: 2 }] } })

analytics.closeAndFlush({ timeout: 20000 }).then(() => {
  if (failures.length) {
    console.error('failed: ' + failures.join('; '))
    process.exit(1)
  }
  console.log('sent')
})
